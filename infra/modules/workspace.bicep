// The Azure ML workspace, deployed into the workspace's resource group: referenced as existing, or
// created with its storage, Key Vault and a GPU cluster that scales to zero. The Function App
// identity gets AzureML Data Scientist on it (submit jobs, register models, create endpoints;
// not create computes or change the workspace). An Event Grid system topic on the workspace
// carries its run events (its location must be the workspace's).
//
// The `azureml` registry (foundation models and the chat_completion_pipeline component) is a
// Microsoft-owned system registry that every authenticated identity can read: there is no role to
// grant for it.
param create bool
param name string
param location string
param tags object
param token string
param applicationInsightsId string
param gpuClusterVmSize string
param gpuClusterMaxNodes int
param gpuClusterName string
@description('Principal id of the Function App identity.')
param principalId string
@description('Name of the workspace system topic: an existing one (a source has at most one) is updated in place to give it a system identity for dead-lettering.')
param systemTopicName string

var azureMLDataScientist = 'f6c7c914-8db3-469d-8ca1-694a8f32e121'

resource existingWorkspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' existing = if (!create) {
  name: name
}

module created 'workspace-new.bicep' = if (create) {
  name: 'workspace-new'
  params: {
    name: name
    location: location
    tags: tags
    token: token
    applicationInsightsId: applicationInsightsId
    gpuClusterVmSize: gpuClusterVmSize
    gpuClusterMaxNodes: gpuClusterMaxNodes
    gpuClusterName: gpuClusterName
    principalId: principalId
  }
}

var workspaceId = create ? created.outputs.id : existingWorkspace.id

resource dataScientistExisting 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!create) {
  name: guid(resourceId('Microsoft.MachineLearningServices/workspaces', name), principalId, azureMLDataScientist)
  scope: existingWorkspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', azureMLDataScientist)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

module topic 'workspace-topic.bicep' = {
  name: 'workspace-topic'
  params: {
    name: systemTopicName
    location: create ? location : existingWorkspace.location
    tags: tags
    workspaceId: workspaceId
  }
}

output id string = workspaceId
output name string = name
output systemTopicName string = systemTopicName
output systemTopicPrincipalId string = topic.outputs.principalId
output gpuClusterName string = gpuClusterName
output gpuClusterPrincipalId string = create ? created.outputs.gpuClusterPrincipalId : ''
